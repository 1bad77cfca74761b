"""The algorithm of ``avatar preprocess``: one source video -> nose-centred face clips
(``source``), and the per-source part files with their reuse (``parts``). The stage
(``stages/preprocess.py``) orchestrates them; the clips artifact is assembled by
:class:`avatarcli.clips.ClipsAssembler`."""
