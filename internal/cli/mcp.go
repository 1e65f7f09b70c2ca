package cli

import (
	"io"
	"log/slog"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/mcpserver"
	"github.com/bangerdev/banger/internal/version"
)

func (a *App) mcpCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "mcp",
		Short: "Serve banger's tools to an AI agent over MCP (stdio)",
		Long: "Runs a Model Context Protocol server on stdin/stdout for an MCP client (Claude Code,\n" +
			"Cursor, an agent framework). Tools: create_vm, list_vms, exec, read_file, write_file,\n" +
			"list_ports, workspace_pull, delete_vm. Tool errors end with the operation id (op-…)\n" +
			"that names the request in bangerd's log. Logs go to stderr (more with --debug).",
		Example: "  banger mcp\n" +
			"  # in an MCP client's config (e.g. .mcp.json):\n" +
			"  #   {\"mcpServers\": {\"banger\": {\"command\": \"banger\", \"args\": [\"mcp\"]}}}",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			c, err := a.client(ctx)
			if err != nil {
				return err
			}
			level := slog.LevelWarn
			if a.debug {
				level = slog.LevelDebug
			}
			log := slog.New(slog.NewJSONHandler(a.Stderr, &slog.HandlerOptions{Level: level}))
			s := mcpserver.New(c, mcpserver.Options{Version: version.String(), Logger: log})
			t := &mcp.IOTransport{Reader: io.NopCloser(a.Stdin), Writer: nopWriteCloser{a.Stdout}}
			err = s.Run(ctx, t)
			if ctx.Err() != nil {
				return nil
			}
			return err
		},
	}
}

type nopWriteCloser struct{ io.Writer }

func (nopWriteCloser) Close() error { return nil }
