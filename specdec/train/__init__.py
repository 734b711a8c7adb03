"""Draft-head training: feature extraction, on-policy regeneration, draft vocabulary, distillation, evaluation."""
