"""A minimal Django project for the tests of ``tidings.integrations.django``."""
