"""The monitoring sidecar (``modelloop monitor``); see docs/monitoring.md.

One module per concept: ``store`` (SQLite/PostgreSQL events, jobs, alerts), ``ingest``
(validation, group commit), ``drift`` (Evidently's tests), ``accuracy`` (labels and the CBPE-style
estimate), ``performance`` (latency, error rate), ``resources`` (CPU, memory, GPU), ``policy``
(the YAML rules), ``jobs`` and ``triggers``/``triggers_cluster`` (retraining), ``alertmanager``,
``metrics`` (the Prometheus catalog), ``evaluate`` (the periodic check), ``sidecar`` (lifecycle),
``app`` (HTTP) and ``cli``.
"""
