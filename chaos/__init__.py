"""The durability chaos rig: ``make chaos`` (and a 60-second run under ``make test-slow``).

Producers commit orders with their events in the PostgreSQL outbox; several ``tidings relay``
processes publish them; two services of workers handle each event (``ledger`` writes its
effect in the SQL inbox's transaction: exactly once; ``mailer`` writes it behind the Redis
inbox: at least once, duplicates counted). Meanwhile a nemesis kills relays and workers with
SIGKILL, stops workers with SIGSTOP past their leases and visibility timeouts, kills the
broker (a Redis of the rig's own, with AOF and ``appendfsync always``) and terminates the
database's connections. Then a checker reconciles every committed order: lost, duplicated,
unexpected, stuck in the outbox, dead-lettered, time to drain, and worker RSS over time.

The rig starts its own Redis on a free port and creates its own PostgreSQL database on the
shared server (dropped at the end); it never restarts a shared server. ``chaos/services.py``
is the application under test; ``chaos/rig.py`` the rig.
"""
