"""Lightning data modules (text classification, click streams), their readers and checks, resumable loaders."""
