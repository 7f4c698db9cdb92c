"""nbgrader configuration for instructors: the course root is this folder.

Source notebooks live in notebooks/<assignment>/ (one assignment, ``day51``);
``make release`` writes the student version to release/day51/.
"""

c = get_config()  # noqa: F821 (provided by nbgrader)
c.CourseDirectory.root = "."
c.CourseDirectory.source_directory = "notebooks"
c.CourseDirectory.course_id = "day51-llm-serving"
# Cells that run the real model take longer than nbgrader's 30 s default.
c.ExecutePreprocessor.timeout = 900
# Outputs folders and caches are not part of a release.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "outputs", "feedback"]
