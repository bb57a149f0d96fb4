__version__ = "0.2.0"  # 0.2: run folders keyed by real paths, a ledger of plan generations
