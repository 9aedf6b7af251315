"""The pure core: policy, plans, outcomes, decisions, credits. No I/O, no clock reads, no locks."""
