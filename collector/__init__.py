"""hostwall collector: drains what the datapath reports (ring buffer, drop aggregation, conntrack) and
ships SIEM records. Design and internal contracts: docs/collector.md.

Kernel side: ringbuf (mmap ring-buffer consumer, batch decode), kernel (pinned maps: drop drain,
conntrack scan, loss counters). Records: records (canonical ECS dicts), enrich, anomaly, encoders.
Service: pipeline (asyncio on uvloop), accounting (loss ledger), config (typed config), sinks
(jsonl, console, ...), cli (`hostwall-collector`, entry point collector.cli:main).
"""
