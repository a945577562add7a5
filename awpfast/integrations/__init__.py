"""Optional framework integrations (each needs its framework installed; none is a dependency).

* :mod:`awpfast.integrations.huggingface`: ``AWPTrainer`` / ``AWPTrainerMixin``, a Hugging Face
  ``transformers.Trainer`` whose training step perturbs the weights with Box AWP, AWP or SAM.
* PyTorch Lightning: no module is needed; pass the wrapper as the LightningModule's optimizer
  and use manual optimization (the recipe is in README.md and docs/family.md).
"""
