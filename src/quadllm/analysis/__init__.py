"""Looking inside: the outlier subspace, the rank advisor, the drift check, the HTML report."""
