"""hostwall collector: drains what the datapath reports (ring buffer, drop aggregation, conntrack) and
ships SIEM records. Design and internal contracts: docs/collector.md.

Modules: ringbuf (mmap ring-buffer consumer, batch decode), kernel (pinned maps: drop drain,
conntrack scan, loss counters), accounting (loss ledger), config (typed config), pipeline (asyncio
service), sinks (jsonl, console, ...), cli (`hostwall-collector`).
"""
