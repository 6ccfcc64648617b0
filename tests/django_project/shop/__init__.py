"""A test app with one model, ``Shipment``: the effect rows of the Django inbox tests."""
