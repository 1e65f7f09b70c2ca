package cli

import (
	"fmt"
	"os"
	"syscall"

	"github.com/spf13/cobra"
)

// mcpCommand is `banger mcp`. The server itself is bangerd's (`bangerd mcp`,
// see mcpserver.StdioArg): this process makes sure bangerd runs, then
// becomes that one, on the same stdio. So the MCP SDK is not linked into
// banger, whose start every `banger exec` pays.
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
			if _, err := a.client(cmd.Context()); err != nil { // starts bangerd if needed
				return err
			}
			bin, err := bangerdPath()
			if err != nil {
				return err
			}
			argv := []string{"bangerd", "mcp"}
			if a.debug {
				argv = append(argv, "--debug")
			}
			// --home is in BANGER_HOME already (the root's PersistentPreRunE).
			if err := syscall.Exec(bin, argv, os.Environ()); err != nil {
				return fmt.Errorf("run bangerd's MCP server (%s): %w", bin, err)
			}
			return nil
		},
	}
}
