"""What a person looks at: plotly figures, circuitsvis views, the explorer page. Imports the layers before it, never runs."""
