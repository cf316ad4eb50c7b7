"""Faster R-CNN on PASCAL VOC with the suite's backbones: the VOC loader (``detection.voc``), the devkit's
AP (``detection.voc_eval``), the model (``detection.model``) and the torchvision engine (``detection.train``,
``tricks detection train|eval``). The detectron2 engine is not built yet."""
