"""``sweep``: Optuna studies over the finetune and SAE stages, one MLflow child run per trial."""
