"""Model- and data-specific code; everything else in rdoq is model-agnostic."""
