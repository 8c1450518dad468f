"""Multi-modal dialogue transfer (paper Table 4 / Table 8; the LLaVA-1.5 recipe)."""
