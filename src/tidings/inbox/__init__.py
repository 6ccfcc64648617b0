"""Idempotency stores: the :class:`~tidings.ports.Inbox` adapters that outlive a process.

- :mod:`tidings.inbox.sql` (``pip install 'tidings[sql]'``): the done mark is a row committed in
  the same transaction as the handler's own writes, so an effect in that database happens once.
- :mod:`tidings.inbox.redis` (``pip install 'tidings[redis]'``): ``SET NX`` with a lease; the
  done mark follows the handler, so an effect outside Redis happens at least once.

Import the adapter you use explicitly; this package imports neither, so neither extra is needed
until you do.
"""
