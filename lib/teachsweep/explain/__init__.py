"""Explainers: functions and small modules that turn a model and a batch into per-token scores.

Every explainer returns *pre-softmax* scores (batch, tokens); `token_distribution` turns them into the masked
softmax over real tokens that SMaT's explanation loss compares. The registry maps a name to a static teacher
explainer and its default explanation weight beta (docs/jobs/scaffold.md); the relevance explainers register
here too."""
