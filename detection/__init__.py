"""Faster R-CNN on VOC-layout datasets with the suite's backbones: the loader with your own classes
(``detection.voc``), the devkit's AP and results format (``detection.voc_eval``), the model
(``detection.model``), the torchvision engine (``detection.train``), the detectron2 engine
(``detection.d2_engine``, the only module importing detectron2), ``tricks voc-eval`` (``detection.cli``)
and the Fashion-MNIST scenes in the VOCdevkit layout (``detection.scenes``)."""
