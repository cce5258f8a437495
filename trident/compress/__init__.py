"""Model compression and its quality measurement. So far: perplexity on fixed windows of a text
(:mod:`trident.compress.eval`, ``trident eval ppl``), the yardstick every compressed variant is held to."""
