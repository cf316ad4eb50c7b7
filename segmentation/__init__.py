"""Dilated FCN on ADE20K with the suite's backbones (mmsegmentation and plain-PyTorch engines). Not built yet."""
