// Renders Ollama TEMPLATEs with Go's text/template, the engine Ollama uses, for tunekit's tests.
// Input (stdin): a JSON list of {"template": string, "data": object}. Output (stdout): a JSON list of
// {"text": string} or {"error": string}, one per input, in order. Templates run with missingkey=zero, as Ollama's.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type job struct {
	Template string         `json:"template"`
	Data     map[string]any `json:"data"`
}

type result struct {
	Text  *string `json:"text,omitempty"`
	Error string  `json:"error,omitempty"`
}

func render(j job) result {
	t, err := template.New("").Option("missingkey=zero").Parse(j.Template)
	if err != nil {
		return result{Error: err.Error()}
	}
	var b strings.Builder
	if err := t.Execute(&b, j.Data); err != nil {
		return result{Error: err.Error()}
	}
	s := b.String()
	return result{Text: &s}
}

func main() {
	var jobs []job
	if err := json.NewDecoder(os.Stdin).Decode(&jobs); err != nil {
		os.Stderr.WriteString("bad input: " + err.Error() + "\n")
		os.Exit(2)
	}
	out := make([]result, len(jobs))
	for i, j := range jobs {
		out[i] = render(j)
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
