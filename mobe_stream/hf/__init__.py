"""Files written next to a compact output so that other tools load it (never imported by mobe-stream)."""
