"""Framework integrations: each subpackage is an optional extra and imports nothing on its own."""
