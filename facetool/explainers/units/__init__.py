"""Hierarchical Network Dissection of units (``facetool dissect units``): which face concepts the channels
of a layer stand for, and which biases a model picked up.

``dictionary``  the face dictionary (parts, local and global concepts) from a store or HND's CSV layout
``dissect``     thresholds, IoU, probabilistic pairing, global stage, bias links, comparison
``report``      the self-contained HTML report and :func:`dissect_to_folder`
"""
