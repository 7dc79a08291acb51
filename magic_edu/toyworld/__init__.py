"""ShapesWorld, the offline toy world: scenes and captions, and how its models were trained."""
