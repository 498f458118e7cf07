"""The serving half of convserve. Never imports torch: its container has none."""
