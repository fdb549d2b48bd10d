"""Routing analysis: record which experts the routers choose (`routes`), the paper's section 5 statistics and the
expert-offloading questions (`stats`, `report`), expert ablation (`ablation`) and token colouring (`html`)."""
