"""model -> traced graph (``hybridiff.graph``) -> costed graph -> partition -> plan."""
