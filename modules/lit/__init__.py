"""LightningModules (BERT classifier, stream DLRM), the objective interface pruners implement, and rank helpers."""
