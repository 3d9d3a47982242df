"""One runtime per tier: consume -> core -> produce/apply."""
