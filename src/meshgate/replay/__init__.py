"""Replay before merge: a candidate policy's gateway routes evaluated on recorded audit traffic."""
