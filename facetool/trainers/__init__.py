"""Training methods: one module per method, each a :class:`facetool.engine.Method` plug-in.

``classify``  softmax cross-entropy over identities or attributes, :func:`train_on_store`, ``--init``
``aig``       ConvNet-AIG target schedule and loss (the gated block: :mod:`facetool.models.gated`)
``iig``       ConvNet-IIG attribute gate masks and L_IIG
``abn``       Attention Branch Network: attention + perception cross-entropy
``arcface``   ArcFace / CosFace recognition training with LFW-style validation
``srrl``      SRRL's connector and losses
``condface``  CondFace: SwAV's Sinkhorn assignment of routing vectors to prototypes (training comes next)
``distill``   distillation: SRRL and the KD / FitNet / AT / RKD / PKT baselines (a package)
"""
