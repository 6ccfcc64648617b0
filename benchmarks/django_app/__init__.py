"""The Django app of the inbox benchmark: one model, ``Delivery``, the handler's effect row."""
