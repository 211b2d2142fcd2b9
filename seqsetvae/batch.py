"""The packed batch layout shared by the data pipeline and the model.

Dimension legend, used in every shape comment of this package:
    B subjects (or labelled samples), S sets per subject, N events per set,
    D model width, Z latent width, V vocabulary size, H attention heads.

A batch is a dict of tensors. Sets are left-aligned: the valid sets of a subject
come first, in time order, then padding. Events inside a set are unordered and
also left-aligned.

    codes       int64   [B, S, N]  vocabulary index; PAD_CODE where event_mask is False
    values      float32 [B, S, N]  normalised value; 0 where has_value is False
    has_value   bool    [B, S, N]  True where the event carries a numeric value
    event_mask  bool    [B, S, N]  True for real events
    set_times   float32 [B, S]     hours since the subject's first set
    set_mask    bool    [B, S]     True for real sets
    label       float32 [B]        optional, finetuning only: 1.0 for a positive label
"""

PAD_CODE = 0
UNK_CODE = 1
N_SPECIAL_CODES = 2

BATCH_KEYS = ("codes", "values", "has_value", "event_mask", "set_times", "set_mask")
