"""Dilated FCN on ADE20K with the suite's backbones. In: the ADE20K loader (``segmentation.ade20k``),
mmseg-style mIoU/mAcc/aAcc (``segmentation.metrics``) and the FCN model (``segmentation.model``); the
mmsegmentation and plain-PyTorch training engines are not built yet."""
