"""Searches over a pass's knobs (schedules measured against a quality budget); not passes themselves."""
