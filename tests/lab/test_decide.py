"""Each claim's decide() on synthetic result sets that must give each verdict."""
