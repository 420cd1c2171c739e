"""EVA-CLIP vision towers: the preset registry, model construction and weight loading."""
