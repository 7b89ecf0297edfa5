"""Plain ``torch.nn`` models and their parts: the prunable BERT, DLRM, gates, token and structured pruning ops."""
