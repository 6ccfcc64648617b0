"""``manage.py tidings_relay``."""
