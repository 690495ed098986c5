using System.Net;
using System.Net.Sockets;

namespace Blip2Mesh.Cli;

/// <summary>
/// The ports a service is about to listen on, checked before it starts: a port in use is one line naming the port,
/// the service and how to choose another, not the web host's stack trace.
/// </summary>
internal static class ListenPorts
{
    /// <param name="service">"the gateway", "the vision service", …</param>
    /// <param name="instead">How to choose another port, e.g. "--port N".</param>
    public static void RequireFree(string service, IPAddress address, int port, string instead)
    {
        try
        {
            using var listener = new TcpListener(address, port);
            listener.Start();
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.AddressAlreadyInUse)
        {
            throw new InvalidOperationException($"{service} cannot listen on {address}:{port}: the port is in use (another blip2mesh?); stop what holds it or choose another port with {instead}");
        }
        catch (SocketException e) when (e.SocketErrorCode is SocketError.AccessDenied or SocketError.AddressNotAvailable)
        {
            throw new InvalidOperationException($"{service} cannot listen on {address}:{port}: {(e.SocketErrorCode == SocketError.AccessDenied ? "not permitted" : "no such address on this machine")}; choose another with {instead}");
        }
    }
}
