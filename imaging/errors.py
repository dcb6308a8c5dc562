"""Domain errors of the MRI layer, worded for the user who supplied the data."""


class StudyError(ValueError):
    """Input that cannot become a study: names the file and the problem (`flair volume has 4 dimensions`)."""


class DicomError(StudyError):
    """A DICOM input that cannot be read safely (unsafe zip, missing slices, inconsistent geometry)."""
