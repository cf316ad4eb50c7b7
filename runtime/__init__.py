"""The shared training runtime under every task: distributed set-up (``distributed``), precision
(``precision``), the optimizer step with accumulation and the non-finite policy (``step``), parameter groups
(``optim``), LR schedules as pure functions incl. poly and linear scaling (``schedules``), checkpoints and
exact resume (``checkpoint``), per-sample seeding and resumable loaders (``data``), run logging
(``logger``), the typed config loader (``config``) and the embedded Fashion-MNIST scenes (``scenes``).
Imports torch and at most ``backbones``; never a task package."""
