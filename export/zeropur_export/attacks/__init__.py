"""Attacks: every attack the evaluation runs, once each (PGD, AutoAttack, the adaptive gradients, the query
attacks, the ART bridge), and the suite that runs them image by image, resumable."""
