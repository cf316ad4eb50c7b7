"""Faster R-CNN on PASCAL VOC with the suite's backbones. In: the VOC loader (``detection.voc``), the
devkit's AP (``detection.voc_eval``) and the torchvision Faster R-CNN + FPN model (``detection.model``); the
detectron2 and torchvision training engines are not built yet."""
