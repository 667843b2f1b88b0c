"""What the tests share: tiny models (``models``), token-id pairs and scoring them (``pairs``), launched and
in-process runs (``runs``), vision-language fixtures (``vlm``) and TRL as a numerical oracle (``trl_oracle``)."""
