"""ShapesWorld, the offline toy world: scenes and captions, and how its models were trained.

* :mod:`~magic_edu.toyworld.shapes`: scenes, captions, stories, and the grounding checks;
* :mod:`~magic_edu.toyworld.train`: ``magic-edu toy``, training everything (settings in
  :mod:`~magic_edu.toyworld.config`);
* :mod:`~magic_edu.toyworld.lm_training`: the tokenizer and the SimCTG / MLE language models;
* :mod:`~magic_edu.toyworld.clip_data`, :mod:`~magic_edu.toyworld.clip_training`: CLIP's data and training;
* :mod:`~magic_edu.toyworld.tuning`: MAGIC's k, alpha and beta tuned on validation scenes;
* :mod:`~magic_edu.toyworld.report`: the README's results table.
"""
