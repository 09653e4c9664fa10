"""3D-SAutoMed (Liang et al.): automatic multi-class segmentation of a volume slice by slice with SAM's 2D encoder."""
