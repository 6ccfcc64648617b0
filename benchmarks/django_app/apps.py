"""The ``bench_django`` app."""

from django.apps import AppConfig


class BenchDjangoConfig(AppConfig):
    """The benchmark's models."""

    name = "benchmarks.django_app"
    label = "bench_django"
    default_auto_field = "django.db.models.BigAutoField"
