"""PET/CT visual grounding: report sentences -> weak lesion labels, and ConTEXTual Net 3D, a 3D residual U-Net whose
skip connections are gated by the report's tokens.

Pipeline (official: zhuemann/cog_2d_segmentation and zhuemann/ConTEXTual_Net_3D_Visual_Grounding)::

    report --extract_findings--> [Finding(sentence, slice, SUVmax)] --weak_labels(suv volume)--> lesion masks
    (image, scrub_stated_values(sentence)) --ReportTokenEncoder + ContextualNet3D--> lesion segmentation

Modules: :mod:`.report_parser` (text rules, optional LLM consensus), :mod:`.weak_labels` (seed search, iterative
threshold contour, checks, NIfTI I/O), :mod:`.contextual_net` (the network), :mod:`.text_encoder` (any
``transformers`` encoder, number scrubbing), :mod:`.metrics` (Dice-CE, Dice, lesion F1), :mod:`.data` and
:mod:`.phantoms` (samples, synthetic PET/CT with reports). The Lightning recipe is :mod:`zoo.recipes.grounding`.
"""
from .contextual_net import ContextualNet3D, official_state_dict
from .metrics import dice_ce_loss, dice_score, f1_from_counts, lesion_detection_counts
from .phantoms import PetCtPhantom, make_petct_phantom
from .report_parser import Finding, consensus_vote, extract_findings, llm_slice_suv, parse_llm_response
from .text_encoder import ReportTokenEncoder, build_tiny_text_encoder, scrub_stated_values
from .weak_labels import WeakLabel, find_lesion_seeds, grow_lesion_itm, weak_label_nifti, weak_labels

__all__ = [
    "ContextualNet3D", "Finding", "PetCtPhantom", "ReportTokenEncoder", "WeakLabel", "build_tiny_text_encoder",
    "consensus_vote", "dice_ce_loss", "dice_score", "extract_findings", "f1_from_counts", "find_lesion_seeds",
    "grow_lesion_itm", "lesion_detection_counts", "llm_slice_suv", "make_petct_phantom", "official_state_dict",
    "parse_llm_response", "scrub_stated_values", "weak_label_nifti", "weak_labels",
]
